"""Training: state, the jitted step, sharding and the loop."""
