"""quarl.models"""
