"""The WeChat bot's state shared by the webhook and the jobs: users, context, texts, delivery."""
