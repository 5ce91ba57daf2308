"""Learning from reviewers' verdicts: threshold recalibration, gated bundles, rollouts."""
