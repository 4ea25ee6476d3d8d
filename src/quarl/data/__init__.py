"""quarl.data"""
