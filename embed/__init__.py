"""Image side of lesionfuse: sources, frozen backbone and weights, embedding loop, feature store."""
