"""A small real model that follows the serving contract and misbehaves on request.

It is scripted and packaged like any other model (model.export.export_package), and the service
serves it unchanged. The first character of a text picks a behaviour, for that item only:

    '!'  forward/encode_text raise (the whole batch fails; the service must retry items alone)
    '~'  that row's logits are NaN
    '^'  forward returns one row too few (wrong shape for the batch)
    '#'  each '#' anywhere in a batch adds a fixed amount of busy work (a slow batch)
    '@'  a much longer busy loop (seconds): a forward pass that hangs, for the watchdog
    '%'  the batch runs out of memory unless this item is alone in it (splitting the batch helps)
    '&'  the batch runs out of memory, even with this item alone (500 out_of_memory)
    '*'  the model breaks: this and every later call raises, golden inputs included ...
    '+'  ... until an item starting with '+' mends it

Out of memory is raised as a RuntimeError saying "out of memory", as TorchScript re-raises a CUDA
allocator failure from inside a scripted module. `rows_seen` counts the rows each method
received, so a test can prove a request never ran.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BOOM = ord("!") + 1  # token ids are UTF-8 bytes + 1
NAN = ord("~") + 1
SHAPE = ord("^") + 1
SLOW = ord("#") + 1
HANG = ord("@") + 1
GREEDY = ord("%") + 1
HUGE = ord("&") + 1
BREAK = ord("*") + 1
MEND = ord("+") + 1
SPIN_PER_MARK = 400  # 64x64 matmuls per '#', about 8 us each here: 3 ms a mark, 0.2 s for 60
HANG_SPINS = 100_000  # about 2 s on one core: far past the watchdog limits the tests set


class ProbeModel(nn.Module):
    # No `from __future__ import annotations` here: TorchScript reads these annotations at runtime.
    rows_seen: Tensor
    spin_seed: Tensor
    broken: Tensor

    def __init__(self, num_labels: int, dim: int = 16) -> None:
        super().__init__()
        # Module attributes, not globals: TorchScript reads constants from the module.
        self.boom, self.nan, self.shape, self.slow, self.spin_per_mark = BOOM, NAN, SHAPE, SLOW, SPIN_PER_MARK
        self.hang, self.hang_spins, self.greedy, self.huge = HANG, HANG_SPINS, GREEDY, HUGE
        self.break_mark, self.mend = BREAK, MEND
        self.image_projection = nn.Linear(3 * 4, dim)  # 3 channels x a 2x2 grid of means
        self.token_embedding = nn.Embedding(257, dim, padding_idx=0)
        self.head = nn.Linear(2 * dim, num_labels)
        self.register_buffer("rows_seen", torch.zeros(1, dtype=torch.int64))
        self.register_buffer("spin_seed", torch.eye(64) * 0.5)
        self.register_buffer("broken", torch.zeros(1, dtype=torch.int64))

    def _image(self, image: Tensor) -> Tensor:
        pixels = image.float() / 255.0  # (B, 3, H, W)
        pooled = F.adaptive_avg_pool2d(pixels, 2).flatten(1)  # (B, 12)
        return F.normalize(self.image_projection(pooled), dim=-1)  # (B, D)

    def _text(self, tokens: Tensor) -> Tensor:
        mask = (tokens > 0).unsqueeze(-1).float()  # (B, L, 1)
        summed = (self.token_embedding(tokens) * mask).sum(1)  # (B, D)
        return F.normalize(summed / mask.sum(1).clamp(min=1.0), dim=-1)

    def _busy(self, tokens: Tensor) -> Tensor:
        spins = int((tokens == self.slow).sum()) * self.spin_per_mark
        spins += int((tokens[:, 0] == self.hang).sum()) * self.hang_spins
        x = self.spin_seed
        for _ in range(spins):
            x = torch.tanh(x @ x + self.spin_seed)
        return x.mean() * 0.0  # (,) exactly zero, but keeps the work from being optimized away

    def _check(self, tokens: Tensor) -> None:
        first = tokens[:, 0]
        if bool((first == self.mend).any()):
            self.broken.zero_()
        if bool((first == self.break_mark).any()):
            self.broken.fill_(1)
        self._check_broken()
        if bool((first == self.boom).any()):
            raise RuntimeError("probe: injected failure")
        if bool((first == self.huge).any()) or (tokens.size(0) > 1 and bool((first == self.greedy).any())):
            raise RuntimeError("probe: CUDA out of memory. Tried to allocate 1.00 GiB (injected)")

    def _check_broken(self) -> None:
        if bool(self.broken.item() == 1):
            raise RuntimeError("probe: the model is broken")

    def forward(self, image: Tensor, tokens: Tensor) -> dict[str, Tensor]:
        self.rows_seen += tokens.size(0)
        self._check(tokens)
        image_embedding = self._image(image)
        text_embedding = self._text(tokens)
        logits = self.head(torch.cat([image_embedding, text_embedding], dim=1)) + self._busy(tokens)  # (B, C)
        poisoned = (tokens[:, 0] == self.nan).unsqueeze(1)  # (B, 1)
        logits = torch.where(poisoned, torch.full_like(logits, float("nan")), logits)
        if bool((tokens[:, 0] == self.shape).any()):
            logits = logits[1:]
        return {"logits": logits, "image_embedding": image_embedding, "text_embedding": text_embedding}

    @torch.jit.export
    def encode_image(self, image: Tensor) -> Tensor:
        self.rows_seen += image.size(0)
        self._check_broken()
        return self._image(image)

    @torch.jit.export
    def encode_text(self, tokens: Tensor) -> Tensor:
        self.rows_seen += tokens.size(0)
        self._check(tokens)
        return self._text(tokens) + self._busy(tokens)
