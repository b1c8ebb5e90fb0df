"""Test support for cameras: frames that carry their own number, and a live MJPEG camera over HTTP."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np

W, H = 160, 120
BITS = 10
BLOCK = W // BITS


def draw(number: int) -> np.ndarray:
    """A BGR test frame whose top band encodes ``number`` in binary, one 16-px block per bit."""
    image = np.full((H, W, 3), 90, np.uint8)
    for bit in range(BITS):
        if number >> bit & 1:
            image[0:48, bit * BLOCK : (bit + 1) * BLOCK] = 255
        else:
            image[0:48, bit * BLOCK : (bit + 1) * BLOCK] = 0
    return image


def decode(image: np.ndarray) -> int:
    """The number drawn by ``draw`` (reads the centre of each block, away from JPEG ringing)."""
    grey = image.mean(axis=2) if image.ndim == 3 else image
    number = 0
    for bit in range(BITS):
        centre = grey[16:32, bit * BLOCK + 4 : (bit + 1) * BLOCK - 4]
        if centre.mean() > 127:
            number |= 1 << bit
    return number


class MjpegServer:
    """A tiny live camera: multipart/x-mixed-replace JPEGs at ``fps`` on 127.0.0.1, numbered from ``first``."""

    def __init__(self, port: int = 0, first: int = 0, fps: float = 50.0) -> None:
        self.sent = first - 1
        self._next = first
        self._fps = fps
        self._stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path != "/stream.mjpg":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                while not server._stopping.is_set():
                    number = server._next
                    server._next += 1
                    _, jpeg = cv2.imencode(".jpg", draw(number))
                    data = jpeg.tobytes()
                    head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                    try:
                        self.wfile.write(head + data + b"\r\n")
                        self.wfile.flush()
                    except OSError:
                        return
                    server.sent = number
                    time.sleep(1 / server._fps)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/stream.mjpg"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop like a camera that lost power: listener closed and open streams cut."""
        self._stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(2)
