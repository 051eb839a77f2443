"""The operator surfaces: the control socket and its wire protocol, the CLI, `ctl top`, log set-up."""
