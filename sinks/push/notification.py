"""The provider-neutral notification built from a push job: what it says and how it collapses.

The title comes from a localised template (the recipient's locale, falling back to English);
what it reveals follows the tenant's preview mode:

- ``full``: the sender's name in the title and the message (text, or "Photo" …) as the body;
- ``sender``: the sender's name in the title, no body;
- ``none``: a generic title ("New message"), no body.

A job stands for ``merged_count`` messages of one conversation (the stream stage collapses a
burst into one push), so the title counts them. Every notification of a conversation carries the
conversation id as its collapse id (APNs ``apns-collapse-id``, FCM collapse key and Android tag)
and thread id: a newer push replaces an older one on the device, and a retried push that did
get through the first time replaces itself rather than showing twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.push_settings import PreviewMode
from schemas.events import CustomBody, MediaBody, PushJob, PushProvider, TextBody, WithheldBody
from sinks.push.policy import Delivery, PushDecision
from sinks.push.proof import CHALLENGE_DEVICE_KEY, CHALLENGE_KEY

#: How much of a text message a preview shows; the providers cap the whole payload at 4 KB.
PREVIEW_MAX_CHARS = 240

DEFAULT_LOCALE = "en"


# One message or several: in every language here "one" is exactly 1 (a job stands for ≥ 1).
TEMPLATES: dict[str, dict[str, str]] = {
    "en": {
        "from.one": "Message from {sender}",
        "from.many": "{count} messages from {sender}",
        "from_in.one": "{sender} in {conversation}",
        "from_in.many": "{count} messages from {sender} in {conversation}",
        "generic.one": "New message",
        "generic.many": "{count} new messages",
        "media.image": "Photo",
        "media.video": "Video",
        "media.audio": "Voice message",
        "media.other": "File",
    },
    "de": {
        "from.one": "Nachricht von {sender}",
        "from.many": "{count} Nachrichten von {sender}",
        "from_in.one": "{sender} in {conversation}",
        "from_in.many": "{count} Nachrichten von {sender} in {conversation}",
        "generic.one": "Neue Nachricht",
        "generic.many": "{count} neue Nachrichten",
        "media.image": "Foto",
        "media.video": "Video",
        "media.audio": "Sprachnachricht",
        "media.other": "Datei",
    },
    "fr": {
        "from.one": "Message de {sender}",
        "from.many": "{count} messages de {sender}",
        "from_in.one": "{sender} dans {conversation}",
        "from_in.many": "{count} messages de {sender} dans {conversation}",
        "generic.one": "Nouveau message",
        "generic.many": "{count} nouveaux messages",
        "media.image": "Photo",
        "media.video": "Vidéo",
        "media.audio": "Message vocal",
        "media.other": "Fichier",
    },
}


@dataclass(frozen=True, slots=True)
class PushTarget:
    """One device to notify: its registered push token."""

    device_id: str
    provider: PushProvider
    token: str
    app_id: str
    """The APNs bundle id (the APNs topic) or the FCM application id: one of the tenant's apps
    (the push sink routes it by the tenant's settings, never by what the client wrote)."""
    project_id: str | None = None
    """The FCM project to send through (the tenant's); None: the sender's own."""


@dataclass(frozen=True, slots=True)
class PushNotification:
    """What a provider sender turns into its request."""

    job_id: str
    conversation_id: str
    conversation_seq: int
    message_id: str
    title: str
    body: str | None
    badge: int
    """The user's total unread count."""
    quiet: bool
    """Deliver without sound or wake-up (quiet hours)."""
    ttl_seconds: int
    """How long the provider keeps trying a device that is off (0: now or never)."""
    challenge: str | None = None
    """A token challenge (``sinks.push.proof``): a silent push that shows nothing and carries
    only the challenge and the claiming device's id, for the app to echo."""
    claimant_device_id: str | None = None

    @classmethod
    def token_challenge(
        cls, claim_id: str, challenge: str, claimant_device_id: str, ttl_seconds: int
    ) -> PushNotification:
        """The silent push that carries ``challenge`` to a token another user's device holds."""
        return cls(
            job_id=claim_id,
            conversation_id="",
            conversation_seq=0,
            message_id="",
            title="",
            body=None,
            badge=0,
            quiet=True,
            ttl_seconds=ttl_seconds,
            challenge=challenge,
            claimant_device_id=claimant_device_id,
        )

    @property
    def collapse_id(self) -> str:
        return self.conversation_id

    @property
    def thread_id(self) -> str:
        return self.conversation_id

    def data(self) -> dict[str, str]:
        """What the app needs to sync the conversation (or to answer a challenge); strings, as
        FCM data must be."""
        if self.challenge is not None:
            return {
                CHALLENGE_KEY: self.challenge,
                CHALLENGE_DEVICE_KEY: self.claimant_device_id or "",
            }
        return {
            "conversation_id": self.conversation_id,
            "conversation_seq": str(self.conversation_seq),
            "message_id": self.message_id,
        }


def resolve_locale(locale: str | None) -> str:
    """The template language for a BCP 47 or POSIX locale: ``de-AT`` → ``de``; unknown → en."""
    if not locale:
        return DEFAULT_LOCALE
    language = locale.replace("_", "-").split("-", 1)[0].split(".", 1)[0].lower()
    return language if language in TEMPLATES else DEFAULT_LOCALE


def build_notification(
    job: PushJob,
    decision: PushDecision,
    *,
    preview: PreviewMode,
    locale: str | None,
    sender_name: str | None = None,
    conversation_name: str | None = None,
) -> PushNotification:
    """The notification for ``job`` under a decision to send it.

    ``sender_name`` is the sender's display name (the sender's id without one);
    ``conversation_name`` a group's name, shown after the sender's (None for direct chats)."""
    if not decision.send:
        raise ValueError(f"the decision is not to send ({decision.reason})")
    templates = TEMPLATES[resolve_locale(locale)]
    plural = "one" if job.merged_count == 1 else "many"
    values = {
        "sender": sender_name or job.sender_id,
        "conversation": conversation_name or "",
        "count": str(job.merged_count),
    }
    if preview is PreviewMode.NONE:
        title = templates[f"generic.{plural}"].format(**values)
    elif conversation_name:
        title = templates[f"from_in.{plural}"].format(**values)
    else:
        title = templates[f"from.{plural}"].format(**values)
    body = _preview(job, templates) if preview is PreviewMode.FULL else None
    return PushNotification(
        job_id=job.job_id,
        conversation_id=job.conversation_id,
        conversation_seq=job.conversation_seq,
        message_id=job.message_id,
        title=title,
        body=body,
        badge=job.unread_total,
        quiet=decision.delivery is Delivery.QUIET,
        ttl_seconds=decision.ttl_seconds,
    )


def _preview(job: PushJob, templates: dict[str, str]) -> str | None:
    """The body of a full preview: the text, or what kind of media; nothing for custom content
    (the server does not know what it looks like) or when the job carries no body (large
    groups)."""
    match job.body:
        case TextBody(text=text):
            if len(text) <= PREVIEW_MAX_CHARS:
                return text
            return text[: PREVIEW_MAX_CHARS - 1].rstrip() + "…"
        case MediaBody(mime=mime):
            kind = mime.split("/", 1)[0]
            return templates.get(f"media.{kind}", templates["media.other"])
        case CustomBody() | WithheldBody() | None:
            return None
