"""quarl.inject"""
