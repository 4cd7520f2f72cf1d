"""The pure core: parameters, the model as a function L(θ, δ), targets, engines, norms and projections.

Nothing here imports the attacks, the methods, the scale helpers or the application.
"""
