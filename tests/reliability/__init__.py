"""The reliability suite (issue 7): load, cancellation, and what must hold after them."""
