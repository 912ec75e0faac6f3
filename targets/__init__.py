"""bitrl_compile.targets"""
