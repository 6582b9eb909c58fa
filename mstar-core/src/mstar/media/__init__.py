"""Media in requests: fetching (URLs, data URIs; SSRF guard, size and time limits), decoding
(images with Pillow, audio with soundfile/PyAV, video with PyAV), and per-request uploads.
Every failure is a `MediaError` carrying the HTTP status to answer with."""

from mstar.media.audio import Audio, load_audio
from mstar.media.fetch import decode_base64, decode_data_url, fetch_media, media_hash
from mstar.media.image import IMAGE_FORMATS, image_from_array, load_image
from mstar.media.limits import MediaError, MediaLimits
from mstar.media.uploads import UploadStore
from mstar.media.video import Video, load_video

__all__ = [
    "IMAGE_FORMATS",
    "Audio",
    "MediaError",
    "MediaLimits",
    "UploadStore",
    "Video",
    "decode_base64",
    "decode_data_url",
    "fetch_media",
    "image_from_array",
    "load_audio",
    "load_image",
    "load_video",
    "media_hash",
]
