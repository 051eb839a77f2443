"""The application: the config schema, the tree built from it, and the operator commands (`System`)."""
