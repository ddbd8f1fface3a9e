"""ServerApps used only by tests: an adversarial coordinator and a recording one (each runs the real ClientApp)."""
