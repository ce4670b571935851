"""Models: the custom CNN, the project's ResNet-18, the CUBS blocks and heads."""
