"""The push sender's provider layer: APNs and FCM delivery for users with no online device.

- :mod:`sinks.push.policy` — whether and how to notify (mutes, quiet hours, staleness): a pure
  decision per job.
- :mod:`sinks.push.notification` — the notification a job becomes: localised title, the tenant's
  preview mode, collapse and thread ids.
- :mod:`sinks.push.apns`, :mod:`sinks.push.fcm` — one request to a provider, classified.
- :mod:`sinks.push.reliability` — bounded concurrency, retries with backoff, circuit breakers;
  an outcome record per attempt.
- :mod:`sinks.push.settings` — the ``IM_PUSH__`` settings group.

Delivery guarantee: at least once per device and job, collapsed on the device by conversation
(a retried push replaces itself). Key: the push-jobs topic is keyed by user.
"""
