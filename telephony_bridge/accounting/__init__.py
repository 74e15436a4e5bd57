"""Device accounting: which Savants device serves which call, within Savants' per-device limits."""
