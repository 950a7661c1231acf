"""The scorer service: log-probabilities of given text, and Toolformer's positions and call filter."""
