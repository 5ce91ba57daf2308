"""The resolver: reviewers' verdicts joined with their review requests (``emoworker resolve``)."""
