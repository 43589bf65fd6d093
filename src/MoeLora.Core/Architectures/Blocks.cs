using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>Building blocks shared by the decoder families (attention, gated MLP, the CausalLM skeleton).</summary>
internal static partial class Blocks
{
    /// <summary>The activation module class transformers instantiates for <c>hidden_act</c>.</summary>
    public static string ActivationClass(string act, Layout layout) => act switch
    {
        // transformers 5 maps "silu" to its own SiLUActivation; 4.x used torch's nn.SiLU.
        "silu" or "swish" => layout == Layout.V5 ? "SiLUActivation" : "SiLU",
        "gelu" => "GELUActivation",
        "gelu_pytorch_tanh" => layout == Layout.V5 ? "GELUTanh" : "PytorchGELUTanh",
        "gelu_new" => "NewGELUActivation",
        "quick_gelu" => "QuickGELUActivation",
        "relu" => "ReLU",
        "relu2" => "ReLUSquaredActivation",
        _ => act,
    };

    /// <summary>The head_dim rule of every non-DeepSeek model: config.head_dim when set, else hidden / heads.</summary>
    public static long HeadDim(ModelConfig c, long hidden, long heads, long? classDefault = null)
    {
        var explicitHeadDim = c.IntOrNull("head_dim", classDefault);
        return explicitHeadDim ?? hidden / heads;
    }

    /// <summary>Standard attention: q, k, v, o projections (order matters for named_modules).</summary>
    public static void Attention(TreeBuilder b, string className, long hidden, long heads, long kvHeads, long headDim,
        bool qkvBias, bool oBias, Action<TreeBuilder>? beforeProjections = null, Action<TreeBuilder>? afterProjections = null)
    {
        using (b.Scope("self_attn", className, ModuleLocation.Attention))
        {
            beforeProjections?.Invoke(b);
            b.Linear("q_proj", hidden, heads * headDim, qkvBias);
            b.Linear("k_proj", hidden, kvHeads * headDim, qkvBias);
            b.Linear("v_proj", hidden, kvHeads * headDim, qkvBias);
            b.Linear("o_proj", heads * headDim, hidden, oBias);
            afterProjections?.Invoke(b);
        }
    }

    /// <summary>A gated MLP (gate_proj, up_proj, down_proj, then the activation module).</summary>
    public static void GatedMlp(TreeBuilder b, string name, string className, long hidden, long intermediate, bool bias,
        string actClass, ModuleLocation location, string actName = "act_fn", bool actFirst = false)
    {
        using (b.Scope(name, className, location))
        {
            if (actFirst) b.Leaf(actName, actClass);
            b.Linear("gate_proj", hidden, intermediate, bias);
            b.Linear("up_proj", hidden, intermediate, bias);
            b.Linear("down_proj", intermediate, hidden, bias);
            if (!actFirst) b.Leaf(actName, actClass);
        }
    }

    /// <summary>The v4 per-expert ModuleList: experts.{e} each a gated MLP.</summary>
    public static void PerExpertMlps(TreeBuilder b, string listClass, string expertClass, long experts, long hidden,
        long intermediate, string actClass, string gate = "gate_proj", string up = "up_proj", string down = "down_proj",
        bool mixtralOrder = false)
    {
        using (b.Scope("experts", listClass, ModuleLocation.RoutedExpert))
        {
            for (var e = 0; e < experts; e++)
            {
                using (b.Scope(e.ToString(System.Globalization.CultureInfo.InvariantCulture), expertClass))
                {
                    if (mixtralOrder)
                    {
                        // Mixtral registers w1 (gate), w2 (down), w3 (up).
                        b.Linear(gate, hidden, intermediate);
                        b.Linear(down, intermediate, hidden);
                        b.Linear(up, hidden, intermediate);
                    }
                    else
                    {
                        b.Linear(gate, hidden, intermediate);
                        b.Linear(up, hidden, intermediate);
                        b.Linear(down, intermediate, hidden);
                    }
                    b.Leaf("act_fn", actClass);
                }
            }
        }
    }

    /// <summary>
    /// The transformers-5 fused experts module: gate_up_proj [E, 2I, H] and down_proj [E, H, I], (out, in) per expert.
    /// </summary>
    public static void FusedExperts(TreeBuilder b, string className, long experts, long hidden, long intermediate, string actClass)
    {
        using (b.Scope("experts", className, ModuleLocation.RoutedExpert, kind: ModuleKind.Experts, numExperts: experts))
        {
            b.Param("gate_up_proj", experts, 2 * intermediate, hidden);
            b.Param("down_proj", experts, hidden, intermediate);
            b.Leaf("act_fn", actClass);
        }
    }

    /// <summary>
    /// A transformers-5 TopK router module holding weight [E, H] (not an nn.Linear); <paramref name="correctionBias"/>:
    /// it also holds the persistent <c>e_score_correction_bias</c> buffer [E].
    /// </summary>
    public static void TopKRouter(TreeBuilder b, string name, string className, long experts, long hidden, bool bias = false,
        bool correctionBias = false)
    {
        using (b.Scope(name, className, ModuleLocation.Router, kind: ModuleKind.Router))
        {
            b.Param("weight", experts, hidden);
            if (bias) b.Param("bias", experts);
            if (correctionBias) b.Buffer("e_score_correction_bias", experts);
        }
    }

    /// <summary>
    /// The <c>XForCausalLM</c> skeleton: model.embed_tokens, model.layers.{i}, model.norm, model.rotary_emb, lm_head.
    /// <paramref name="layerNormFinal"/>: model.norm is an nn.LayerNorm with bias (PhiMoE) instead of an RMSNorm;
    /// <paramref name="lmHeadBias"/>: lm_head is built with a bias (PhiMoE's <c>lm_head_bias</c>);
    /// <paramref name="modelTail"/>: modules the model registers after its rotary embedding.
    /// </summary>
    public static void CausalLm(TreeBuilder b, string prefix, long vocab, long hidden, long layers, bool tie,
        Action<int> layer, string modelClass = "", string? normClass = null, bool rotary = true, string modelAttr = "model",
        bool layerNormFinal = false, bool lmHeadBias = false, Action? modelTail = null)
    {
        var modelName = modelAttr;
        using (b.Scope(modelName, modelClass.Length > 0 ? modelClass : prefix + "Model"))
        {
            DecoderStack(b, prefix, vocab, hidden, layers, layer, normClass, rotary, layerNormFinal, modelTail);
        }
        b.Linear("lm_head", hidden, vocab, lmHeadBias, location: ModuleLocation.LmHead,
            tiedWeightTo: tie ? $"{modelName}.embed_tokens.weight" : null);
    }

    /// <summary>Layer indices [0, L) split by a predicate into (moe, dense).</summary>
    public static (List<int> Moe, List<int> Dense) SplitLayers(long layers, Func<int, bool> isMoe)
    {
        var moe = new List<int>();
        var dense = new List<int>();
        for (var i = 0; i < layers; i++) (isMoe(i) ? moe : dense).Add(i);
        return (moe, dense);
    }

    /// <summary>Standard spec fields for a CausalLM whose language model sits at the root.</summary>
    public static ModelSpec Spec(ModelConfig config, string modelType, ModuleTree tree, MoeFacts moe, long hidden,
        long layers, long vocab, long heads, long kvHeads, bool tie, string act) => new()
    {
        ModelType = modelType,
        Architecture = tree.Root.ClassName,
        Config = config,
        TextConfig = config,
        Tree = tree,
        Moe = moe,
        HiddenSize = hidden,
        NumHiddenLayers = layers,
        VocabSize = vocab,
        NumAttentionHeads = heads,
        NumKeyValueHeads = kvHeads,
        DecoderLayersPath = "model.layers",
        InputEmbeddings = "model.embed_tokens",
        OutputEmbeddings = "lm_head",
        TieWordEmbeddings = tie,
        HiddenAct = act,
    };
}
