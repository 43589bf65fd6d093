using MoeLora.Core.Architectures;
using MoeLora.Core.Architectures.Runtime;
using MoeLora.Torch.Nn;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Models;

/// <summary>
/// Outputs of one forward. Hidden states use HF indexing: [0] embeddings, [i] block i-1, last normed; with
/// hyper-connections the layers' states are the streams [B, S, n, H] (the first the repeated embeddings), as
/// transformers' output_hidden_states records them, and the last the normed [B, S, H].
/// </summary>
public sealed class CausalLmOutput : IDisposable
{
    public required Tensor Logits { get; init; }
    public required IReadOnlyList<Tensor> HiddenStates { get; init; }
    /// <summary>Router logits [B*S, E] per MoE layer, in layer order (as transformers' <c>router_logits</c>).</summary>
    public required IReadOnlyList<Tensor> RouterLogits { get; init; }

    public void Dispose()
    {
        Logits.Dispose();
        foreach (var t in HiddenStates) t.Dispose();
        foreach (var t in RouterLogits) t.Dispose();
    }
}

/// <summary>
/// <c>XForCausalLM</c>: <c>model.embed_tokens</c>, <c>model.layers.{i}</c>, <c>model.norm</c>, <c>model.rotary_emb</c>
/// (or the family's <see cref="ModelNames"/>), then <c>lm_head</c>, built by <see cref="ModelBuilder"/> from Core's <see cref="ModelSpec.Runtime"/>; this class
/// runs the shared forward. A multimodal model (<see cref="DecoderRuntime.Towers"/>) holds these under its text prefix,
/// beside inert towers: its forward is transformers' text-only forward (input_ids, no pixel or audio inputs).
/// </summary>
public sealed class CausalLm : HfModule, IDisposable
{
    /// <summary>Core's description of this model (config, v5 tree, MoE facts, runtime settings).</summary>
    public ModelSpec Spec { get; }
    public DecoderRuntime Runtime { get; }
    public string ModelType => Spec.ModelType;
    public long VocabSize => Runtime.VocabSize;
    /// <summary>The config.json this model was built from (truncation included), e.g. for Core's AdapterPlan.</summary>
    public string ConfigJson => Spec.Config.Json.ToJsonString();
    public ScalarType DType { get; }
    public Device Device { get; }
    readonly Embedding _embed;
    readonly ModelRoot _model;
    readonly List<IDecoderLayer> _layers;
    readonly INorm _norm;
    readonly INorm? _embedNorm;
    readonly Linear _lmHead;
    readonly HyperHead? _hcHead;

    internal CausalLm(ModelSpec spec, DecoderRuntime runtime, Init init, Func<int, HfModule> layer)
    {
        Spec = spec; Runtime = runtime; DType = init.DType; Device = init.Device;
        var names = runtime.Names ?? ModelNames.Llama;
        var model = new ModelRoot(runtime.EmbeddingAffine, runtime.HiddenSize, init);
        _model = model;
        // The rotary module is parameter-free, present in named_modules as in transformers (where the family has one).
        if (names is { Rotary: { } first, RotaryFirst: true }) model.Add(first, new Container());
        _embed = model.Add(names.Embeddings, new Embedding(runtime.VocabSize, runtime.HiddenSize, init));
        var layers = model.Add(names.Layers, new Container());
        _layers = [];
        for (int i = 0; i < runtime.Layers.Count; i++) _layers.Add((IDecoderLayer)layers.Add(i.ToString(System.Globalization.CultureInfo.InvariantCulture), layer(i)));
        if (names is { Rotary: { } before, RotaryBeforeNorm: true, RotaryFirst: false }) model.Add(before, new Container());
        _norm = (INorm)model.Add(names.FinalNorm, Norms.Create(runtime.HiddenSize, runtime.FinalNorm, init));
        if (runtime.EmbeddingNorm is { } en) _embedNorm = (INorm)model.Add(en.Name, Norms.Create(runtime.HiddenSize, en.Norm, init));
        if (names is { Rotary: { } after, RotaryBeforeNorm: false, RotaryFirst: false }) model.Add(after, new Container());
        if (runtime.HyperConnections is { } hc) _hcHead = model.Add(hc.HeadName, new HyperHead(runtime.HiddenSize, hc, init));
        _lmHead = new Linear(runtime.HiddenSize, runtime.VocabSize, runtime.LmHeadBias, init);
        if (runtime.TieWordEmbeddings) _lmHead.TieTo(_embed.weight);
        if (runtime.Towers is not { } towers)
        {
            AddChild(names.Root, model);
            AddChild("lm_head", _lmHead);
            return;
        }
        // A multimodal model: the text model, its head and the towers (built after them, never run) at their paths.
        foreach (var path in towers.Order)
        {
            if (path == towers.TextModel) Place(path, model);
            else if (path == towers.LmHead) Place(path, _lmHead);
            else if (spec.Tree.Find(path) is null) PlaceParameter(path, InertTower.BareParameter(spec.Tree, path, init));
            else Towers.Add(Place(path, InertTower.Build(spec.Tree, path, init)));
        }
    }

    /// <summary>A multimodal model's vision/audio towers and projectors: built with their parameters, never run.</summary>
    public List<InertTower> Towers { get; } = [];

    /// <summary>Registers <paramref name="module"/> at a dotted path, its missing parents as parameter-less containers.</summary>
    T Place<T>(string path, T module) where T : HfModule
    {
        var (parent, name) = ParentOf(path);
        return parent is Container c ? c.Add(name, module) : AddChild(name, module);
    }

    /// <summary>
    /// Registers a bare tower parameter (<see cref="InertTowers"/>: DeepSeek-OCR-2's <c>model.view_separator</c>) at a
    /// dotted path. Parameters enumerate before children, so it comes first under its parent whatever the order here.
    /// </summary>
    void PlaceParameter(string path, Tensor value)
    {
        var (parent, name) = ParentOf(path);
        if (parent is Container c) c.AddInertParameter(name, value);
        else AddParameter(name, value);
    }

    /// <summary>The module that holds <paramref name="path"/>'s last part (this model or a container), and that part;
    /// missing parents are created as containers.</summary>
    (HfModule Parent, string Name) ParentOf(string path)
    {
        var parts = path.Split('.');
        HfModule parent = this;
        foreach (var part in parts[..^1])
            parent = parent.Children.FirstOrDefault(x => x.Name == part).Module
                ?? (parent == this ? AddChild(part, new Container()) : parent is Container pc ? pc.Add(part, new Container())
                    : throw new NotSupportedException($"{path}: a tower or head inside the text model is not supported."));
        if (parent != this && parent is not Container)
            throw new NotSupportedException($"{path}: a tower or head inside the text model is not supported.");
        return (parent, parts[^1]);
    }

    public int NumLayers => _layers.Count;

    /// <summary>
    /// How attention runs: SDPA unless <c>MOELORA_ATTN_IMPLEMENTATION=eager</c> (read when the model is built) or set
    /// here; eager materialises the S × S scores, for parity checks against transformers' eager path.
    /// </summary>
    public AttentionImplementation Attention { get; set; } = AttentionImplementations.Default();

    /// <summary>Sets how every fused-expert module runs (grouped batched matmuls by default; the per-expert loop for reference).</summary>
    public void SetExpertDispatch(Nn.ExpertDispatch dispatch)
    {
        foreach (var (_, m) in NamedModules()) if (m is Nn.ExpertsBase e) e.Dispatching = dispatch;
    }

    /// <summary>Frees the native memory of every parameter and buffer (adapters included).</summary>
    public void Dispose()
    {
        foreach (var (_, t) in StateDict()) t.Dispose();
    }

    /// <summary>
    /// Recompute each decoder layer in backward instead of keeping its intermediates (<see cref="CheckpointedLayer"/>,
    /// transformers' <c>gradient_checkpointing_enable()</c>): a step then keeps about two hidden states per layer.
    /// </summary>
    public bool GradientCheckpointing { get; set; }

    void RefuseDropoutUnderCheckpointing()
    {
        if (!Training) return;
        foreach (var (name, m) in NamedModules())
            if (m is Lora.LoraWrapper { DropoutProbability: > 0 } w)
                throw new NotSupportedException($"gradient checkpointing with lora_dropout {w.DropoutProbability} ({name}): a recomputed layer would draw new dropout masks in MoeLora's runtime; use --lora-dropout 0 or leave out --gradient-checkpointing.");
    }

    /// <summary>Called after each decoder layer's intermediates are freed (tests count the tensors still alive).</summary>
    internal Action? AfterLayer { get; set; }

    /// <summary>
    /// Forward like <c>model(input_ids, attention_mask, output_hidden_states=True)</c>. Positions are 0..S-1 for every
    /// row unless given (transformers does not shift them for left padding).
    /// </summary>
    public CausalLmOutput Forward(Tensor inputIds, Tensor? attentionMask = null, bool outputHiddenStates = false, Tensor? positionIds = null)
    {
        var (logits, hidden, router) = Run(inputIds, attentionMask, outputHiddenStates, positionIds, Logits);
        return new CausalLmOutput { Logits = logits, HiddenStates = hidden, RouterLogits = router };
    }

    /// <summary>
    /// transformers' causal-LM loss of <c>model(input_ids, attention_mask, labels=input_ids)</c> (<see cref="MoeLora.Torch.Training.CausalLmLoss"/>).
    /// With a frozen LM head it never forms the logits: the head and the cross-entropy run a chunk of tokens at a time
    /// (<see cref="MoeLora.Torch.Training.LinearCrossEntropy"/>, sized by Core's <see cref="Core.Memory.ChunkedLmLoss"/>), the same
    /// values per token at a fraction of the memory. An adapted or trained head takes the logits path.
    /// </summary>
    public Tensor CausalLmLoss(Tensor inputIds, Tensor? attentionMask = null) =>
        CausalLmLoss(inputIds, attentionMask, Core.Memory.ChunkedLmLoss.ChunkTokens(VocabSize));

    /// <summary><see cref="CausalLmLoss(Tensor, Tensor?)"/> with chunks of <paramref name="chunkTokens"/> rows (tests use a few).</summary>
    internal Tensor CausalLmLoss(Tensor inputIds, Tensor? attentionMask, long chunkTokens)
    {
        if (!ChunkedLossApplies)
        {
            using var output = Forward(inputIds, attentionMask);
            return MoeLora.Torch.Training.CausalLmLoss.Compute(output.Logits, inputIds, attentionMask);
        }
        var labels = MoeLora.Torch.Training.CausalLmLoss.ShiftedLabels(inputIds, attentionMask, Device).reshape(-1);
        var head = new MoeLora.Torch.Training.LinearCrossEntropy.Head(_lmHead.weight, _lmHead.bias, Runtime.Scaling?.LogitsMultiplier ?? 1.0, chunkTokens);
        var (loss, _, router) = Run(inputIds, attentionMask, false, null,
            h => MoeLora.Torch.Training.LinearCrossEntropy.Apply(h.reshape(-1, h.shape[^1]), labels, head));
        foreach (var r in router) r.Dispose();
        labels.Dispose();
        return loss;
    }

    /// <summary>The LM head has no adapter and nothing of it trains (as Core's <see cref="Core.Memory.ChunkedLmLoss.Applies"/> predicts from the plan).</summary>
    internal bool ChunkedLossApplies =>
        _lmHead.Adapters.Count == 0 && _lmHead.WeightDeltas.Count == 0 && !_lmHead.weight.requires_grad && _lmHead.bias is not { requires_grad: true };

    /// <summary>
    /// The head's logits. <see cref="MoeLora.Torch.Training.LinearCrossEntropy"/> forms the same logits (linear, then the
    /// multiplier) chunk by chunk: a change to what the head computes must be made there too.
    /// </summary>
    Tensor Logits(Tensor h)
    {
        var logits = _lmHead.Forward(h);
        return Runtime.Scaling is { LogitsMultiplier: not 1.0 } ls ? logits * ls.LogitsMultiplier : logits;
    }

    /// <summary>The decoder stack, then <paramref name="head"/> on the final normed hidden state.</summary>
    (Tensor Head, List<Tensor> Hidden, List<Tensor> Router) Run(Tensor inputIds, Tensor? attentionMask, bool outputHiddenStates, Tensor? positionIds,
        Func<Tensor, Tensor> head)
    {
        using var scope = NewDisposeScope();
        long b = inputIds.shape[0], s = inputIds.shape[1];
        var ids = inputIds.to(Device);
        var mask = (attentionMask ?? ones(b, s, ScalarType.Int64)).to(Device);
        var pos = (positionIds ?? arange(s, ScalarType.Int64).unsqueeze(0).expand(b, s)).to(Device);
        var ctx = new ForwardContext { Positions = pos, AttentionMask = mask, DType = DType, Attention = Attention, InputIds = ids };
        var h = _embed.Forward(Runtime.PlaceholderIds is { Count: > 0 } placeholders ? EmbeddedIds(ids, placeholders) : ids);
        if (Runtime.Scaling is { EmbeddingMultiplier: not 1.0 } es) h = h * es.EmbeddingMultiplier;
        if (_model.Affine is { } affine) h = (h + affine.Bias) * affine.Scale;
        if (_embedNorm is not null) for (int i = 0; i < Runtime.EmbeddingNormPasses; i++) h = _embedNorm.Forward(h);
        if (Runtime.ResidualInFp32) h = h.to(ScalarType.Float32);
        // Hyper-connections: the embeddings repeated into every stream [B, S, n, H] (recorded as hidden_states[0]).
        if (Runtime.HyperConnections is { } hc) h = h.unsqueeze(2).expand(-1, -1, hc.Streams, -1).contiguous();
        var hidden = new List<Tensor>();
        if (outputHiddenStates) hidden.Add(h);
        var checkpointed = GradientCheckpointing && is_grad_enabled();
        if (checkpointed) RefuseDropoutUnderCheckpointing();
        foreach (var layer in _layers)
        {
            h = checkpointed ? CheckpointedLayer.Run(layer, h, ctx) : layer.Forward(h, ctx);
            if (outputHiddenStates) hidden.Add(h);
            // A TorchSharp tensor lives until its handle is disposed, so without this every layer's intermediates (the
            // expert rows, attention projections, ...) would stay allocated until the forward returns: measured on
            // Qwen3-30B-A3B, 17 GiB for a 512-token no-grad forward. Autograd keeps its own references to what
            // backward needs, so freeing the handles here changes nothing in training but the peak.
            scope.DisposeEverythingBut([h, .. hidden, .. ctx.Held()]);
            AfterLayer?.Invoke();
        }
        if (_hcHead is not null) h = _hcHead.Forward(h);
        h = _norm.Forward(h.dtype == DType ? h : h.to(DType));
        if (outputHiddenStates) hidden[^1] = h;
        var output = head(h);
        return (output.MoveToOuterDisposeScope(), hidden.Select(t => t.MoveToOuterDisposeScope()).ToList(),
            ctx.RouterLogits.Select(t => t.MoveToOuterDisposeScope()).ToList());
    }

    /// <summary>The ids the embedding reads: <paramref name="placeholders"/> become id 0 (<see cref="DecoderRuntime.PlaceholderIds"/>).</summary>
    static Tensor EmbeddedIds(Tensor ids, IReadOnlyList<long> placeholders)
    {
        var isPlaceholder = zeros_like(ids, ScalarType.Bool);
        foreach (var id in placeholders) isPlaceholder = isPlaceholder.logical_or(ids.eq(id));
        return ids.masked_fill(isPlaceholder, 0);
    }
}

/// <summary>
/// <c>model</c>: the decoder's children, and, where the family has them (<see cref="DecoderRuntime.EmbeddingAffine"/>),
/// its own per-channel embedding scale and bias Parameters (ones and zeros at init), listed before the children.
/// </summary>
internal sealed class ModelRoot : HfModule
{
    public (Parameter Scale, Parameter Bias)? Affine { get; }

    public ModelRoot((string Scale, string Bias)? affine, long hidden, Init init)
    {
        if (affine is { } a) Affine = (AddParameter(a.Scale, init.Ones(hidden)), AddParameter(a.Bias, init.Zeros(hidden)));
    }

    public T Add<T>(string name, T m) where T : HfModule => AddChild(name, m);
}
