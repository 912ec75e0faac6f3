"""bitrl_compile.trainers"""
