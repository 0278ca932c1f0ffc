"""denoiseg's built-in plugins. Each module is a plugin registered through the
``denoiseg.plugins`` entry-point group, exactly as a third-party plugin would be."""
