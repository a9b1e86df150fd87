"""Label Studio ML backend: StableSeg brush-mask pre-annotations for a project's labels.

``server.create_app`` builds the WSGI app (``_wsgi.app`` for gunicorn, ``python cli.py serve``
to run it); ``model.StableSegBackend`` is the label-studio-ml model class; ``label_config`` reads
the labeling config, ``images`` fetches task images, ``cache`` holds the model once per process,
``training`` routes Label Studio's Start Training, ``backend_settings`` reads the environment.
Nothing heavy is imported here.
"""
