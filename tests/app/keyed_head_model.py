"""A small real model that picks its head from a ModuleDict by a key: TorchScript accepts it, and
freezing refuses it ("Freezing modules containing prim::ModuleContainerIndex is not supported")."""

# mypy: disable-error-code="assignment,empty-body"
# (TorchScript's interface idiom: a ModuleDict entry read as the interface, a method body of `pass`;
# a `# type:` comment inside a scripted function would be read by TorchScript as a type comment.)

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KeyedHeadModel(nn.Module):
    """A model that picks its head from a ModuleDict by a key: a construct freezing refuses."""

    def __init__(self, num_labels: int, dim: int = 16) -> None:
        super().__init__()
        self.image_projection = nn.Linear(3, dim)
        self.token_embedding = nn.Embedding(257, dim, padding_idx=0)
        self.heads = nn.ModuleDict({"plain": nn.Linear(2 * dim, num_labels), "spare": nn.Linear(2 * dim, num_labels)})
        self.head_name = "plain"

    @torch.jit.export
    def encode_image(self, image: Tensor) -> Tensor:
        return F.normalize(self.image_projection(image.float().mean(dim=(2, 3)) / 255.0), dim=-1)

    @torch.jit.export
    def encode_text(self, tokens: Tensor) -> Tensor:
        return F.normalize(self.token_embedding(tokens).sum(dim=1), dim=-1)

    def forward(self, image: Tensor, tokens: Tensor) -> dict[str, Tensor]:
        image_embedding, text_embedding = self.encode_image(image), self.encode_text(tokens)
        head: HeadInterface = self.heads[self.head_name]
        logits = head.forward(torch.cat([image_embedding, text_embedding], dim=-1))
        return {"logits": logits, "image_embedding": image_embedding, "text_embedding": text_embedding}


@torch.jit.interface
class HeadInterface(nn.Module):
    def forward(self, input: Tensor) -> Tensor:  # nn.Linear's own name for it
        pass
