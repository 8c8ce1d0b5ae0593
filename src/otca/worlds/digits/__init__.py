"""The embedded default world: text-to-image on scikit-learn's bundled handwritten digits at 16x16."""
