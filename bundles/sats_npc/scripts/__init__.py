"""SATS bundle scripts: network, projection head, margin loss, mirror-consistent sampling, trainer."""
