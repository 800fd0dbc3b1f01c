"""The web blueprints: relay, wechat, admin, health, pay notify. They never import each other."""
