package nodesim

import (
	"context"
	"errors"
	"slices"

	"k8s.io/apimachinery/pkg/types"

	"github.com/dynamig/dynamig/node-agent/deviceplugin"
)

// AgentPlugin is the agent's device plugin on a node in agent mode
// (Options.AgentPlugin), in process: what deviceplugin.Plugin does with
// the real kubelet, as kubelet's device manager sees it. Run registers
// every resource set so far and keeps the registration until its context
// ends; then kubelet loses the plugin (markResourceUnhealthy, as for
// NVIDIA's). Set sends each resource's full device list (ListAndWatch),
// all healthy: a device left out is no longer allocatable
// (genericDeviceUpdateCallback), and kubelet keeps it allocated to the pod
// that holds it.
type AgentPlugin struct {
	n *Node
}

// AgentPlugin returns the node's plugin for the agent; nil unless the
// node is in agent mode.
func (n *Node) AgentPlugin() *AgentPlugin {
	if !n.opts.AgentPlugin {
		return nil
	}
	return &AgentPlugin{n: n}
}

// agentUID names the agent's registration among the node's plugins.
const agentUID types.UID = "dynamig-agent"

// Set replaces the devices of each resource listed.
func (p *AgentPlugin) Set(devices map[string][]deviceplugin.Device) {
	n := p.n
	n.mu.Lock()
	defer n.mu.Unlock()
	n.agentDevices = map[string][]string{}
	for r, ds := range devices {
		for _, d := range ds {
			n.agentDevices[r] = append(n.agentDevices[r], d.ID)
		}
	}
	if n.registeredUID == agentUID {
		n.advertiseLocked(n.agentDevices)
	}
}

// Run registers and serves until ctx ends.
func (p *AgentPlugin) Run(ctx context.Context) error {
	n := p.n
	n.mu.Lock()
	if n.registeredUID == agentUID {
		n.mu.Unlock()
		return errors.New("the agent's device plugin is registered already")
	}
	n.pluginUID, n.registeredUID = agentUID, agentUID
	n.advertiseLocked(n.agentDevices)
	n.mu.Unlock()
	<-ctx.Done()
	n.pluginStopped(agentUID)
	return nil
}

// Kubelet is never restarted on this node model: the kubelet is always there.
func (p *AgentPlugin) Kubelet() deviceplugin.KubeletState { return deviceplugin.KubeletState{} }

// KubeletChanged is never signalled.
func (p *AgentPlugin) KubeletChanged() <-chan struct{} { return nil }

// advertiseLocked makes each resource listed have exactly its devices,
// all healthy. Callers hold n.mu.
func (n *Node) advertiseLocked(ids map[string][]string) {
	for r, list := range ids {
		n.endpoints[r] = &endpoint{healthy: slices.Clone(list)}
		n.server.SetAllocatable(r, list)
	}
	n.statusChanged()
}
