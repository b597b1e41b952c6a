"""verl_mega.kernels"""
