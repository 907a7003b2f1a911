"""The evals: one module per eval, registered through :mod:`saeravel.evals.api`.

The package itself holds no code, so importing one eval imports only the API and that eval.
"""
