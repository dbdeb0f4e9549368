"""Where images and metadata meet: fusion MLP, stacking, report, scoring, demo."""
