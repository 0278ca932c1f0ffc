"""BioImage Model Zoo side of denoiseg: export, test, predict and import model packages."""
