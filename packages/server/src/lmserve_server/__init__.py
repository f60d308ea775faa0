"""lmserve."""
