"""Out-of-distribution signals: is a post something the model can read at all (another language,
code, logs, links)? See docs/ood.md."""
