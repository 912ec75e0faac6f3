"""bitrl_compile.passes"""
