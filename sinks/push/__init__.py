"""The push sender's provider layer: APNs and FCM delivery for users with no online device.

- :mod:`sinks.push.policy` — whether and how to notify (mutes, quiet hours, staleness): a pure
  decision per job.
- :mod:`sinks.push.notification` — the notification a job becomes: localised title, the tenant's
  preview mode, collapse and thread ids.
- :mod:`sinks.push.apns`, :mod:`sinks.push.fcm` — one request to a provider, classified.
- :mod:`sinks.push.reliability` — bounded concurrency, retries with backoff, circuit breakers;
  an outcome record per attempt.
- :mod:`sinks.push.tokens` — who holds a token: scoped to the tenant, moved by the same user,
  another user's (or another tenant's, on a shared app) claim refused unless proven.
- :mod:`sinks.push.proof` — the challenge that proves a device receives a token's pushes.
- :mod:`core.push_settings` — the ``IM_PUSH__`` settings group: credentials, each tenant's
  apps (where its pushes go), preview modes, the proof secret.

Delivery guarantee: at least once per device and job, collapsed on the device by conversation
(a retried push replaces itself). Key: the push-jobs topic is keyed by user.
"""
