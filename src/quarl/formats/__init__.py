"""quarl.formats"""
