"""Human labelling: Label Studio."""
