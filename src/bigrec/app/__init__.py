"""A finished run put to use: the recommender, its manifest, the HTTP service and its page."""
