using MoeLora.Core.Architectures.Runtime;
using MoeLora.Torch.Nn;
using MoeLora.Torch.Runtime;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// Llama 4's chunked mask on a left-padded row: transformers 5.17's chunked_overlay counts chunks from each row's first
/// real token ((idx − left_padding) // chunk), so a row padded by 3 with chunk 4 starts its chunks at index 3, not 0.
/// </summary>
public class ChunkedMaskTests
{
    [Fact]
    public void ChunksStartAtEachRowsFirstRealToken()
    {
        TorchRuntime.EnsureInitialized();
        const int S = 10, Chunk = 4, Pad = 3;
        var attn = ones(2, S, ScalarType.Int64);
        attn[1, ..Pad] = tensor(0L);
        var ctx = new ForwardContext { Positions = arange(S, ScalarType.Int64).unsqueeze(0).expand(2, S), AttentionMask = attn, DType = ScalarType.Float32 };
        var allowed = ctx.Mask(MaskKind.Chunked, Chunk).squeeze(1).eq(0);   // [B, S, S]
        for (int b = 0; b < 2; b++)
        {
            int pad = b == 0 ? 0 : Pad;
            for (int q = 0; q < S; q++)
                for (int k = 0; k < S; k++)
                {
                    bool want = k <= q && k >= pad && Math.Floor((k - pad) / (double)Chunk) == Math.Floor((q - pad) / (double)Chunk);
                    Assert.True(want == allowed[b, q, k].item<bool>(), $"row {b}, query {q}, key {k}: expected {(want ? "allowed" : "masked")}");
                }
        }
    }
}
