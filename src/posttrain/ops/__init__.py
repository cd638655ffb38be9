"""The maths: pure functions on tensors and masks, each with its formula and source."""
