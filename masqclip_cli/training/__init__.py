"""Training: Hungarian matching and the losses of the proposal network and of MasQ-Tuning."""
