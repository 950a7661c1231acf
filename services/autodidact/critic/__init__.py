"""The critic service: critique→revision rounds and AI preference labels against constitutions."""
