namespace MoeLora.Core.Analysis;

/// <summary>
/// What <c>output_hidden_states=True</c> keeps alive versus only the circuit-breaker target layers.
/// Indices follow Hugging Face: <c>hidden_states[0]</c> is the embedding output, <c>hidden_states[i]</c> the output of
/// block i-1, so a model with L layers returns L+1 states of [batch, seq, hidden] each. Models with hyper-connections
/// (HY-V4, DeepSeek-V4) carry <see cref="Streams"/> parallel residual streams: every state but the last (the final
/// norm's output) is [batch, seq, streams, hidden].
/// </summary>
public sealed record HiddenStatesMemory
{
    public required int BatchSize { get; init; }

    public required int SeqLength { get; init; }

    public required DType DType { get; init; }

    public required long HiddenSize { get; init; }

    public required long NumLayers { get; init; }

    public required IReadOnlyList<int> TargetLayers { get; init; }

    /// <summary>Parallel residual streams (hyper-connections); 1 for an ordinary residual stream.</summary>
    public long Streams { get; init; } = 1;

    /// <summary>Bytes of one [batch, seq, hidden] state (a single stream).</summary>
    public long BytesPerState => BatchSize * (long)SeqLength * HiddenSize * DType.Bytes();

    /// <summary>Bytes of hidden_states[i] of a model with <paramref name="layers"/> blocks: all streams, except the last state.</summary>
    long StateBytes(long i, long layers) => (i == layers ? 1 : Streams) * BytesPerState;

    public long NumStates => NumLayers + 1;

    public long AllLayersBytes => (NumLayers * Streams + 1) * BytesPerState;

    public long TargetLayersBytes => TargetLayers.Distinct().Sum(t => StateBytes(t, NumLayers));

    public double SavingPercent => AllLayersBytes == 0 ? 0 : 100.0 * (1 - (double)TargetLayersBytes / AllLayersBytes);

    /// <summary>
    /// Blocks the reference recipe keeps: <c>num_hidden_layers = max(target) + 1</c>, so the highest target state is a
    /// plain block output (the last state, which carries the final norm, is never a target).
    /// </summary>
    public long TruncatedLayers => TargetLayers.Count == 0 ? NumLayers : Math.Min(NumLayers, TargetLayers.Max() + 1L);

    /// <summary>All hidden states of the truncated model (what the retain loss stacks).</summary>
    public long TruncatedStatesBytes => (TruncatedLayers * Streams + 1) * BytesPerState;

    /// <summary>The default circuit-breaker targets: hidden_states[L/4] and hidden_states[L/2].</summary>
    public static IReadOnlyList<int> DefaultTargetLayers(long layers) =>
        new[] { (int)(layers / 4), (int)(layers / 2) }.Where(x => x > 0).Distinct().ToList();

    /// <summary>Checks that every target indexes an existing hidden state (0..L).</summary>
    public static void Validate(IReadOnlyList<int> targets, long layers)
    {
        foreach (var t in targets)
        {
            if (t < 0 || t > layers)
                throw new UserInputException($"--cb-target-layers {t} does not exist: this model returns hidden_states[0..{layers}] ({layers} layers + the embedding output)");
        }
    }
}
