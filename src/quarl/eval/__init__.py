"""quarl.eval"""
