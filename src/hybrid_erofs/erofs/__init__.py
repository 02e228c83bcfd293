"""erofs package."""
