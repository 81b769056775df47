"""HTTP routers, one per API area; `app.main.create_app` mounts them all."""
