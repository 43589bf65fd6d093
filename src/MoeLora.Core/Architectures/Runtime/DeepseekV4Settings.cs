namespace MoeLora.Core.Architectures.Runtime;

/// <summary>
/// DeepSeek-V4's attention (transformers' <c>DeepseekV4Attention</c>), registered sinks (a direct fp32 Parameter, so it
/// enumerates first), q_a_proj, q_a_norm, q_b_proj, kv_proj, kv_norm, o_a_proj, o_b_proj and, on compressed layers,
/// <c>compressor</c>. Queries come from the q LoRA (<c>q_residual = q_a_norm(q_a_proj(x))</c>, q_b_proj, then a
/// parameter-free RMS norm per head); one key/value head (<c>kv_norm(kv_proj(x))</c>, read as both key and value) is
/// shared by all heads. Both get the interleaved-pair rope on the last 2·⌈<paramref name="RopeDim"/>/2⌉ dims of each head
/// (one pair per inverse frequency of the RopeDim-wide table), and
/// the attention output gets the inverse rotation at the query's position (K = V carried the keys' rotation). The
/// sliding-window keys (<paramref name="SlidingWindow"/>) are followed by the compressor's entries under their own
/// additive bias; eager softmax with the per-head sinks, scaling head_dim^-0.5. The output projection is grouped:
/// <c>o_a_proj</c> maps each of <paramref name="OGroups"/> head groups to <paramref name="OLoraRank"/> features
/// (a block-diagonal nn.Linear subclass), <c>o_b_proj</c> mixes them to the hidden size.
/// </summary>
/// <param name="Rope">This layer's rotary table: the "main" rope on sliding layers, the "compress" rope (used by the
/// compressor and indexer too) on compressed ones.</param>
/// <param name="NormEps">rms_norm_eps, of every norm of the block (q_a_norm, q_b_norm, kv_norm, the compressors').</param>
/// <param name="Compressor">The layer's KV compressor; null on "sliding_attention" layers.</param>
public sealed record DeepseekV4AttentionSettings(long Heads, long HeadDim, long QLoraRank, long OGroups, long OLoraRank, long RopeDim,
    RopeSettings Rope, long SlidingWindow, double NormEps, KvCompressorSettings? Compressor) : AttentionSettings;

/// <summary>
/// A DeepSeek-V4 KV compressor (registered position_bias, kv_proj, gate_proj, kv_norm, then the indexer): every closed
/// window of <paramref name="Rate"/> tokens becomes one entry <c>kv_norm(Σ_j softmax_j(gate_j + position_bias_j) ⊙ kv_j)</c>
/// (softmax over the window in fp32), roped at position <c>w · Rate</c>; the tokens after the last full window are not
/// compressed. Query t may read entry w only when <c>w &lt; (t + 1) / Rate</c>.
/// Heavily compressed attention (HCA, <c>DeepseekV4HCACompressor</c>): projections of head_dim, no indexer, every
/// causally allowed entry is read. Compressed sparse attention (CSA, <c>DeepseekV4CSACompressor</c>):
/// projections of 2·head_dim, two series per token; entry w pools window w−1's first series with window w's second
/// (<c>2·Rate</c> slots, the first window's missing half weighted 0), and each query reads only the entries its
/// <paramref name="Indexer"/> picks.
/// </summary>
public sealed record KvCompressorSettings(long Rate, LightningIndexerSettings? Indexer)
{
    /// <summary>CSA's overlapping windows (two series per token); HCA's are disjoint.</summary>
    public bool Overlapping => Indexer is not null;
}

/// <summary>
/// DeepSeek-V4's lightning indexer (<c>DeepseekV4Indexer</c>, registered position_bias, kv_proj, gate_proj, kv_norm,
/// q_b_proj, scorer.weights_proj): its own overlapping compressor at <paramref name="HeadDim"/> over the same windows,
/// queries <c>q_b_proj(q_residual)</c> per head roped at their positions; score(t, s) =
/// <c>Σ_h weights_proj(x)_h·Heads^-0.5 · relu(q_h·k_s)·HeadDim^-0.5</c> in fp32; entries a query may not read score −inf;
/// each query keeps its top <paramref name="TopK"/> (at most all), those not allowed dropped.
/// </summary>
public sealed record LightningIndexerSettings(long Heads, long HeadDim, long TopK);

/// <summary>How DeepSeek-V4's routers turn logits into scores (<c>scoring_func</c>, applied in the logits' dtype).</summary>
public enum RouterScoreFunction
{
    /// <summary><c>sqrt(softplus(l))</c>.</summary>
    SqrtSoftplus,

    /// <summary><c>sigmoid(l)</c>.</summary>
    Sigmoid,
}

/// <summary>
/// DeepSeek-V4's routers (a module holding <c>weight [E, H]</c> and its score_fn): scores = f(x·weightᵀ); the experts are
/// the top-k of scores + <c>e_score_correction_bias</c> (a persistent fp32 buffer, <c>DeepseekV4TopKRouter</c>) or, with
/// <paramref name="HashVocab"/>, the row of the persistent int64 buffer <c>tid2eid [vocab, k]</c> for the token's id
/// (<c>DeepseekV4HashRouter</c>, "hash_moe" layers); weights are the chosen scores renormalised (sum + 1e-20) times
/// <paramref name="Scale"/>. Only the top-k routers' logits are recorded as router logits (transformers records no hash
/// router's).
/// </summary>
public sealed record ScoreFunctionRouterSettings(string Name, long NumExperts, long TopK, RouterScoreFunction Score, double Scale,
    long? HashVocab) : RouterSettings(Name, NumExperts, TopK);
