"""Multi-site deployment on Flower."""
