package compat

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/kubernetes/cmd/kube-scheduler/app"
)

// The scheduler command, wrapped, against an API server too old: it
// exits with the reason before it schedules, having reached the server
// through its --config file's kubeconfig, and records the reason as an
// Event on its own pod.
func TestWrappedCommandRefusesAnOldServer(t *testing.T) {
	var mu sync.Mutex
	var events []v1.Event
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		switch {
		case r.URL.Path == "/version":
			_, _ = io.WriteString(w, `{"major":"1","minor":"31","gitVersion":"v1.31.2"}`)
		case r.Method == http.MethodGet && r.URL.Path == "/api/v1/namespaces/dynamig-system/pods/dynamig-scheduler-0":
			_ = json.NewEncoder(w).Encode(&v1.Pod{TypeMeta: metav1.TypeMeta{Kind: "Pod", APIVersion: "v1"},
				ObjectMeta: metav1.ObjectMeta{Namespace: "dynamig-system", Name: "dynamig-scheduler-0", UID: "uid-0"}})
		case r.Method == http.MethodPost && r.URL.Path == "/api/v1/namespaces/dynamig-system/events":
			body, _ := io.ReadAll(r.Body)
			obj, _, err := scheme.Codecs.UniversalDeserializer().Decode(body, nil, nil) // JSON or protobuf
			ev, ok := obj.(*v1.Event)
			if err != nil || !ok {
				http.Error(w, fmt.Sprintf("not an event: %v", err), http.StatusBadRequest)
				return
			}
			mu.Lock()
			events = append(events, *ev)
			mu.Unlock()
			ev.Kind, ev.APIVersion = "Event", "v1"
			w.WriteHeader(http.StatusCreated)
			_ = json.NewEncoder(w).Encode(ev)
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	dir := t.TempDir()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	require.NoError(t, os.WriteFile(kubeconfig, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "`+srv.URL+`"}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
users: [{name: u, user: {}}]
current-context: c
`), 0o600))
	config := filepath.Join(dir, "config.yaml")
	require.NoError(t, os.WriteFile(config, []byte(`apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection: {kubeconfig: "`+kubeconfig+`"}
leaderElection: {leaderElect: false}
`), 0o600))
	t.Setenv("POD_NAMESPACE", "dynamig-system")
	t.Setenv("POD_NAME", "dynamig-scheduler-0")

	cmd := app.NewSchedulerCommand()
	Wrap(cmd)
	cmd.SetArgs([]string{"--config=" + config, "--secure-port=0"})
	cmd.SilenceUsage, cmd.SilenceErrors = true, true
	err := cmd.Execute()
	require.EqualError(t, err, "unsupported Kubernetes version: dynamig-scheduler needs Kubernetes ≥ 1.34, the API server is v1.31.2")
	mu.Lock()
	defer mu.Unlock()
	require.Len(t, events, 1)
	assert.Equal(t, "UnsupportedAPIServer", events[0].Reason)
	assert.Equal(t, v1.EventTypeWarning, events[0].Type)
	assert.Equal(t, err.Error(), events[0].Message)
	assert.Equal(t, v1.ObjectReference{Kind: "Pod", APIVersion: "v1", Namespace: "dynamig-system", Name: "dynamig-scheduler-0", UID: "uid-0"}, events[0].InvolvedObject)
}
