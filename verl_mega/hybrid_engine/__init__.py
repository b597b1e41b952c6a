"""verl_mega.hybrid_engine"""
