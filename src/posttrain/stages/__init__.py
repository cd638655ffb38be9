"""The post-training stages; each module reads top to bottom: config, data, loss, run."""
